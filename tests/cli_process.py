"""``cifar-resnet`` runs in fresh processes that skip the ~6 s of imports.

Python's forkserver imports ``cifar_resnet.cli`` (torch, Lightning, ...) once; every run is forked from it and
then calls the installed command's entry point, ``cifar_resnet.cli.main``, with its own ``sys.argv``, working
folder, environment, stdout and stderr. Each run is its own process, as with the installed command: its own
exit code, signals and global state. What only a newly started program can show (the installed script,
``python -m``, import-time warnings, the working folder on ``sys.path``, the DDP ranks Lightning starts) is
tested with real subprocesses instead.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

CLI = Path(sys.executable).parent / "cifar-resnet"
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["cifar_resnet.cli"])


def _redirect(fd: int, path: str) -> None:
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(target, fd)
    os.close(target)


def cli_main(*args: str) -> None:
    """The installed ``cifar-resnet`` script's body."""
    sys.argv = [str(CLI), *args]
    from cifar_resnet.cli import main

    sys.exit(main())


def _child(target: Callable[..., Any], args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """``target(*args)`` in the forked process, as in a freshly started one."""
    _redirect(1, stdout)
    if stderr == stdout:
        os.dup2(1, 2)
    else:
        _redirect(2, stderr)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for folder in reversed([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    # Ctrl-C and SIGTERM as a freshly started Python has them (the forkserver ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        target(*args)
    finally:
        atexit._run_exitfuncs()  # a forked child leaves with os._exit, which runs no atexit handlers


class CliProcess:
    """A running ``cifar-resnet`` (see the module docstring), with the parts of :class:`subprocess.Popen`
    the tests use: ``pid``, ``poll``, ``wait``, ``communicate``, ``send_signal``, ``kill``, ``returncode``; and
    ``sentinel``, to wait for its end with ``select``.
    With ``target``, the process runs ``target(*args)`` instead (a function importable by name)."""

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        target: Callable[..., Any] = cli_main,
    ) -> None:
        """Start ``cifar-resnet *args`` in ``cwd``; stdout and stderr go to ``log`` if given (and ``communicate``
        returns nothing), else to temporary files that ``communicate`` reads and removes."""
        self.args = [str(a) for a in args]
        self._files = []
        if log is None:
            for name in ("out", "err"):
                fd, path = tempfile.mkstemp(prefix="cifar-resnet-", suffix=f".{name}")
                os.close(fd)
                self._files.append(path)
        outputs = self._files or [str(log), str(log)]
        self._process = _CONTEXT.Process(
            target=_child, args=(target, self.args, str(cwd), dict(os.environ if env is None else env), *outputs)
        )
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code; minus the signal's number if a signal ended it (as for ``Popen``)."""
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the process ends (for ``select``)."""
        return self._process.sentinel

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(["cifar-resnet", *self.args], timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self._process.kill()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end (``subprocess.TimeoutExpired`` after ``timeout`` s) and return what it wrote to
        stdout and stderr."""
        self.wait(timeout)
        output = tuple(Path(path).read_text(errors="replace") for path in self._files) or ("", "")
        for path in self._files:
            Path(path).unlink(missing_ok=True)
        self._files = []
        return output

    def finish(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Wait, killing it after ``timeout`` s (then ``subprocess.TimeoutExpired``); its exit code and output."""
        try:
            stdout, stderr = self.communicate(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.communicate()
            raise
        return subprocess.CompletedProcess(["cifar-resnet", *self.args], self.returncode, stdout, stderr)


def launch_like_popen(command: list[str], stdout: IO, stderr: int, env: dict[str, str], cwd: Path) -> CliProcess:
    """``subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=..., cwd=...)`` for a command
    ``[python, -m, cifar_resnet, *args]``, as a :class:`CliProcess` (bench/reproduce.py's ``launch``)."""
    program, args = command[:3], command[3:]
    if program[1:] != ["-m", "cifar_resnet"] or stderr != subprocess.STDOUT:
        raise ValueError(f"not a `python -m cifar_resnet` command with stderr to stdout: {command}")
    return CliProcess(args, cwd, env, log=Path(stdout.name))
