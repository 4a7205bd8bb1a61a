"""`python -m cl_tool` (also what `torchrun -m cl_tool` runs)."""

from cl_tool.cli import main

if __name__ == "__main__":
    main()
