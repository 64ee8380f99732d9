"""`python -m locoswarm` is the `locoswarm` console script."""

import sys

if __name__ == "__main__":
    try:
        from locoswarm.cli.main import main
    except KeyboardInterrupt:
        # Ctrl-C while the command's modules load, before cli.main takes the signals over:
        # for the daemon that is a stop like any other (exit 0, docs/status.md).
        raise SystemExit(0 if sys.argv[1:3] == ["node", "join"] else 130) from None
    main()
