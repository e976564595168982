"""`make ssh HOST=lb1`: log in to one of the stack's servers as root with the stack's key.

python -m ops.ssh lb1 [--stack dev]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from ops.stack import SshRunner, StackError, StackOutputs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make ssh", description=__doc__.split("\n")[0])
    parser.add_argument("host", help="server name: lb1, lb2, web1, ...")
    parser.add_argument("--stack", default=os.environ.get("STACK", "dev"))
    args = parser.parse_args(argv)
    try:
        outputs = StackOutputs.load(args.stack)
        with SshRunner(outputs) as runner:
            # not exec: the key file must be removed when the session ends
            return subprocess.run(runner.argv(args.host), check=False).returncode
    except StackError as err:
        print(f"ssh: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
