"""``cl-tool cache``: the decoded-image cache's files, their removal and the size cap."""

from cl_tool.workflows.cache import CacheArgs as ARGS  # noqa: F401

RUN = "cl_tool.workflows.cache:run_cache"  # the workflow function, looked up each time the command runs

HELP = "List the decoded-image cache (size, rows, last use and source of each file, total); --clear or --max trim it."

EPILOG = """Examples:

  cl-tool cache

  cl-tool cache --clear --older-than 30d

  cl-tool cache --max 20G

  CL_TOOL_CACHE_MAX=20G cl-tool train-next a.safetensors --data ./task_b -o b.safetensors

Every command that reads images keeps their decoded pixels in this folder, so that the next command
reading the same data skips decoding. After a command writes a cache file, the least recently used
files are removed until the folder holds at most $CL_TOOL_CACHE_MAX (a size such as 20G; 0 or none:
no cap; default 50G). A file's last use is its modification time, set by every command that reads it.
"""
