"""Config files are checked before jsonargparse reads them, so a file that is no YAML config is named."""

from __future__ import annotations

import codecs
import contextlib
import os
import sys
from typing import Any

import yaml

from cifar_resnet.errors import UserError

CONFIG_MAX_BYTES = 16 * 2**20  # a YAML config is a few KiB; a bigger --config file is something else
# What a config may grow to once its YAML aliases (*name) are replaced by what they stand for, in characters
# of values (and one per entry): a recipe is a few thousand; nested aliases ("billion laughs") reach 10^9.
EXPANDED_MAX = 2**20

_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def check_config_files(args: Any) -> None:
    """Refuse a ``--config`` file in the command line ``args`` (``None``: ``sys.argv``) that is not UTF-8 text
    (a checkpoint, an image, a file saved as Latin-1 or UTF-16), that is not a mapping of settings, or whose
    YAML aliases expand it beyond :data:`EXPANDED_MAX`, naming it; also refuse a command-line value whose
    aliases do: jsonargparse would stop with a bare ``UnicodeDecodeError`` or expand the aliases until memory
    runs out."""
    argv = [str(a) for a in (sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else [])]
    for flag, value in zip(argv, argv[1:] + [""]):
        path = value if flag == "--config" else flag.removeprefix("--config=") if flag.startswith("--config=") else None
        if path is None:
            if "*" in flag:  # a value given on the command line is YAML too
                with contextlib.suppress(yaml.YAMLError):
                    check_yaml_size(flag, "The command-line value")
            continue
        if not path or not os.path.isfile(path):
            continue  # jsonargparse names a missing file itself
        with open(path, "rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
        if len(data) > CONFIG_MAX_BYTES:
            raise UserError(f"--config '{path}' is over {CONFIG_MAX_BYTES // 2**20} MiB: not a YAML config. Pass a recipe's .yaml file.")
        text = decode_config(data, path)
        try:
            root = check_yaml_size(text, f"--config '{path}'")
        except yaml.YAMLError:
            continue  # jsonargparse says where the syntax is wrong
        if not isinstance(root, yaml.MappingNode):
            found = "is empty" if root is None else "holds a list" if isinstance(root, yaml.SequenceNode) else f"holds the single value {root.value!r:.40}"
            raise UserError(f"--config '{path}' {found}: a YAML config is a mapping of settings, `key: value` lines like configs/scratch.yaml.")


def decode_config(data: bytes, path: str) -> str:
    """``data`` as UTF-8 text; else an error that says which encoding the file seems to be in."""
    try:
        text = data.decode("utf-8")
        if "\0" not in text:
            return text
        problem = f"--config '{path}' contains NUL (0x00) bytes, which UTF-8 text has none of"
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        problem = f"--config '{path}' is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line})"
    bom = next((name for mark, name in _BOMS if data.startswith(mark)), None)
    if bom is not None:
        found = f"--config '{path}' is {bom} text (it starts with a {bom} byte-order mark), not UTF-8"
        raise UserError(f"{found}. Save it as UTF-8 (e.g. `iconv -f {bom} -t UTF-8`).")
    if data.count(b"\0") > len(data) // 4:
        found = f"{problem}: every other byte is 0, as in UTF-16 text without a byte-order mark"
        raise UserError(f"{found}. Save it as UTF-8 (e.g. `iconv -f UTF-16LE -t UTF-8`).")
    if all(c >= 0x20 or c in b"\t\n\r" for c in data):
        found = f"{problem}: its bytes read as Latin-1 (or Windows-1252) text, so it was probably saved in that encoding"
        raise UserError(f"{found}. Save it as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`).")
    raise UserError(f"{problem}: not a YAML config, or one saved in another encoding. Pass a recipe's .yaml file, saved as UTF-8.")


def check_yaml_size(text: str, source: str) -> yaml.Node | None:
    """The YAML ``text``'s root node (``None``: empty; ``yaml.YAMLError``: not YAML); an error if its aliases
    expand it beyond :data:`EXPANDED_MAX` or make it contain itself. Aliases share nodes here, so the check
    takes as long as the text is long."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
        too_big = _expanded_size(root, {}, set()) > EXPANDED_MAX
    except RecursionError:
        raise UserError(f"{source} nests its values thousands of levels deep: not a config.") from None
    if too_big:
        raise UserError(
            f"{source} grows to over {EXPANDED_MAX:,} characters once its YAML aliases (*name) are expanded: "
            "nested aliases, not a config. Write the values out, or use fewer aliases."
        )
    return root


def _expanded_size(node: yaml.Node | None, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The size of ``node`` with every alias written out; more than :data:`EXPANDED_MAX` for a node that contains itself."""
    if node is None:
        return 0
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        return EXPANDED_MAX + 1  # an alias inside its own anchor: endless
    if isinstance(node, yaml.ScalarNode):
        size = len(node.value) + 1
    else:
        open_nodes.add(id(node))
        children = [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else node.value
        size = 1
        for child in children:
            size += _expanded_size(child, sizes, open_nodes)
            if size > EXPANDED_MAX:
                break
        open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size
