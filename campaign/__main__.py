"""`python -m campaign`: the same as the `campaign` command."""

from campaign.cli import main

if __name__ == "__main__":  # not when a worker process (the parallel check) imports it as its parent's main
    main()
