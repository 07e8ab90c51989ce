"""`python -m fastdeit ...`: the `fastdeit` command, started as the console script starts it."""

from fastdeit.cli.entry import main

if __name__ == "__main__":
    main()
