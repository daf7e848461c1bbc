"""`python -m gmot_cli` runs the same app as the `gmot` console script (torchrun uses this form)."""

from gmot_cli.app import main

if __name__ == "__main__":
    main()
