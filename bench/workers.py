"""Child processes for cases that need their own interpreter state.

Two reasons to leave the main process: the bayes_ext Python fallback is chosen by an env var read at
import time, and peak-RSS needs an address space that has not held other cases' tensors. Both use a
multiprocessing *forkserver* that has imported torch (and nothing else) once, so each child is a
fresh address space without paying ~2 s for `import torch` again. The server is started from this
process's environment, and each child sets its case's env vars before importing bayes_ext.
"""
import multiprocessing as mp
import os
import sys
import traceback

_CTX = None


def _ctx():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # Only torch: never bayes_ext (its backend is picked per child) nor the main module.
        _CTX.set_forkserver_preload(["torch"])
    return _CTX


def _bench_on_path():
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)


def _apply_env(env):
    """A case's import-time env vars; "0" means unset (the compiled backend)."""
    for k, v in env.items():
        if v == "0":
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _oneshot_main(conn, func_name, arg, env):
    _bench_on_path()
    try:
        _apply_env(env)
        module, fn = func_name.split(":")
        import importlib
        res = getattr(importlib.import_module(module), fn)(arg)
        conn.send(("ok", res))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def call_in_child(func_name, arg, env=None, timeout=600):
    """Run `module:function(arg)` in a fresh forked child; returns its result or raises RuntimeError."""
    ctx = _ctx()
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_oneshot_main, args=(child, func_name, arg, env or {}), daemon=True)
    p.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise RuntimeError(f"timed out after {timeout} s")
        status, res = parent.recv()
    except EOFError:
        status, res = "error", "child died without a result (killed for memory?)"
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    if status != "ok":
        raise RuntimeError(res)
    return res


def _worker_main(conn, env):
    _bench_on_path()
    _apply_env(env)
    import timing  # imports torch, workload, cases; bayes_ext only when a case builds
    runner = None
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "setup":
                runner = None
                runner = timing.LocalRunner(*msg[1:])
                conn.send(("ok", None))
            elif msg[0] == "run":
                conn.send(("ok", runner.run(msg[1])))
            elif msg[0] == "memory":  # CUDA only: in this process, after dropping the runner
                runner = None
                import memory
                conn.send(("ok", memory.measure(msg[1])))
            elif msg[0] == "info":
                import bayes_ext
                conn.send(("ok", {"extension_available": bool(bayes_ext.extension_available())}))
            elif msg[0] == "close":
                conn.send(("ok", None))
                return
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class Worker:
    """A persistent child that builds one workload at a time and times it on request."""

    def __init__(self, env):
        ctx = _ctx()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, env), daemon=True)
        self.proc.start()
        child.close()

    def call(self, *msg, timeout=900):
        self.conn.send(msg)
        if not self.conn.poll(timeout):
            raise RuntimeError(f"worker timed out after {timeout} s")
        status, res = self.conn.recv()
        if status != "ok":
            raise RuntimeError(res)
        return res

    def close(self):
        try:
            self.call("close", timeout=30)
        except Exception:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
