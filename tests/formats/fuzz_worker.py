"""Loads model files named on stdin, one per line, and prints one JSON line per file: the model loaded and
generated two tokens ({"ok": true}), or it was refused with a typed error ({"error": class, "lines": n}), or
something else happened ({"bug": "..."}), a MemoryError included. After the imports and a warm-up load of
the seed models (argv), the address space is limited to what it is then plus LIMIT_MB, so an attempt at a
multi-GB allocation fails as a MemoryError here instead of taking the machine's memory. Run by
test_fuzz_files.py; a crash or a hang is seen there as a missing line."""

import gc
import json
import resource
import sys

LIMIT_MB = 1024


def vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def try_load(path: str) -> dict:
    from openautoglm import Engine
    from openautoglm.errors import OpenAutoGLMError

    try:
        eng = Engine(model=path, progress=False)
        eng.generate("hi", max_tokens=2, ignore_eos=True)
        return {"ok": True}
    except OpenAutoGLMError as e:
        return {"error": type(e).__name__, "lines": len(str(e).splitlines()), "len": len(str(e))}
    except MemoryError:
        return {"bug": "MemoryError (an allocation past the address-space limit)"}
    except Exception as e:  # noqa: BLE001 - anything untyped is what the fuzzer looks for
        msg = str(e)
        if "allocate" in msg.lower():
            return {"bug": f"allocation failure: {type(e).__name__}: {msg[:200]}"}
        return {"bug": f"{type(e).__name__}: {msg[:300]}"}
    finally:
        gc.collect()


def main() -> None:
    import torch

    torch.set_num_threads(1)
    for seed in sys.argv[1:]:  # warm-up: every code path's imports and first allocations
        r = try_load(seed)
        assert r.get("ok"), (seed, r)
    limit = vm_bytes() + LIMIT_MB * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(try_load(line.rstrip("\n"))), flush=True)


if __name__ == "__main__":
    main()
