"""Runs ``python -m gigagpt ARGS`` requests in forked children of one process that imported the CLI once.

A table of refusals pays torch's and Lightning's ~10 s import once instead of per row; each row
still runs the real entry point (``runpy`` on the ``gigagpt`` package, as ``python -m`` does) in a
fresh child process, with its own working directory, environment, stdout and stderr.

Protocol: one JSON object per stdin line, ``{"argv", "cwd", "env", "stdout", "stderr"}`` (the last
two are file paths); one JSON line back, ``{"rc": exit code}``.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import traceback

import gigagpt.cli  # noqa: F401  (the slow imports: torch, Lightning, jsonargparse)


def _child(req: dict) -> int:
    devnull = os.open(os.devnull, os.O_RDONLY)  # the request pipe is not the command's input
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.argv = ["gigagpt", *req["argv"]]
    try:
        runpy.run_module("gigagpt", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exit_:  # what the interpreter does with it
        if exit_.code is None:
            return 0
        if isinstance(exit_.code, int):
            return exit_.code
        print(exit_.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def serve() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            atexit._clear()  # the child's own exit handlers only, run as the interpreter would at exit
            try:
                code = _child(req)
            finally:
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
