"""`python -m bnfold` runs the command line, as the `bnfold` script does."""

from bnfold.cli import main

if __name__ == "__main__":
    main()
