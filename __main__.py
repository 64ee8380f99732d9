"""`python -m locoswarm` is the `locoswarm` console script."""

from locoswarm.cli.main import main

if __name__ == "__main__":
    main()
