"""``python -m cifar_resnet`` runs the same CLI as the ``cifar-resnet`` command."""

from cifar_resnet.entry import main

if __name__ == "__main__":
    main()
