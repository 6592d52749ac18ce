"""A self-contained kernel notebook: the utils/ modules its code imports (transitively), zipped
into a bootstrap cell that unpacks and imports them, and the parameters cell the build injects."""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import nbformat

from utils.kaggle.input import IMPORT_NAMES, MIN_VERSIONS
from utils.kaggle.metadata import (
    BOOTSTRAP_TAG,
    INJECTED_TAG,
    REPO_ROOT,
    KaggleBuildError,
    injected_source,
)

# ---------------------------------------------------------------- build


# Embedded in every kernel: the package itself and what runs before the stage.
KERNEL_BASE_MODULES = ("utils/__init__.py", "utils/kaggle/input.py")


def _module_file(module: str, root: Path) -> Path | None:
    """File of a `utils...` module under root (the repository), or None if it is not one."""
    base = root.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _imported_modules(source: str, package: str = "utils") -> set[str]:
    """Every module a piece of source imports, in functions too (`from a import b`: a and a.b;
    relative imports resolved in `package`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def kernel_modules(sources: list[str], root: Path = REPO_ROOT) -> list[Path]:
    """utils/ files a kernel needs: what its code imports, transitively, with parent packages."""
    files = {root / rel for rel in KERNEL_BASE_MODULES}
    todo = [(src, "utils") for src in sources] + [(f.read_text(), "utils") for f in files]
    while todo:
        source, package = todo.pop()
        for module in _imported_modules(source, package):
            if module.split(".")[0] != "utils":
                continue
            parts = module.split(".")
            for depth in range(1, len(parts) + 1):
                path = _module_file(".".join(parts[:depth]), root)
                if path is not None and path not in files:
                    files.add(path)
                    is_package = path.name == "__init__.py"
                    pkg = ".".join(parts[:depth] if is_package else parts[: depth - 1])
                    todo.append((path.read_text(encoding="utf-8"), pkg))
    return sorted(files)


def utils_archive(files: list[Path] | None = None, root: Path = REPO_ROOT) -> bytes:
    """Deterministic zip of utils/ files (*.py; all of utils/ by default; fixed timestamps)."""
    if files is None:
        files = [p for p in (root / "utils").rglob("*.py") if "__pycache__" not in p.parts]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(files):
            info = zipfile.ZipInfo(path.relative_to(root).as_posix())
            info.date_time = (2024, 1, 1, 0, 0, 0)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def kernel_libraries(archive: bytes, code: list[str]) -> list[str]:
    """The checked libraries (input.MIN_VERSIONS) that a kernel's embedded modules or its own
    cells import: the only ones its version check looks at."""
    sources = list(code)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        sources += [zf.read(name).decode("utf-8") for name in zf.namelist()]
    imported = {m.split(".")[0] for s in sources if s.strip() for m in _imported_modules(s)}
    found = {IMPORT_NAMES[name] for name in imported if name in IMPORT_NAMES}
    return [lib for lib in MIN_VERSIONS if lib in found]


def bootstrap_source(archive: bytes, libraries: list[str], skip_version_check: bool) -> str:
    """First cell of a built kernel: unpack the embedded utils/ and import it from there, then
    check the versions of `libraries`."""
    digest = hashlib.sha256(archive).hexdigest()[:12]
    payload = base64.b64encode(archive).decode("ascii")
    checked = repr(tuple(libraries))
    if skip_version_check:
        gate = (
            "# Built with --skip-version-check: every difference is printed, nothing stops.\n"
            f"check_versions({checked}, stop=False)\n"
        )
    else:
        gate = (
            "# Stops here, in one line, only on a version known not to work with the code this\n"
            "# kernel embeds; any other difference from the tested pins is a WARNING line.\n"
            f"check_versions({checked})\n"
        )
    return (
        "# FusionNetX bootstrap, written by `python -m utils.kaggle.build build`: the utils/\n"
        "# package travels inside this notebook, so the kernel needs no repository checkout,\n"
        "# no code dataset and no internet.\n"
        "import base64, io, sys, tempfile, zipfile\n"
        "from pathlib import Path\n"
        f'FUSIONNETX_SRC = Path(tempfile.gettempdir()) / "fusionnetx-src-{digest}"\n'
        f'zipfile.ZipFile(io.BytesIO(base64.b64decode("{payload}"))).extractall(FUSIONNETX_SRC)\n'
        "sys.path.insert(0, str(FUSIONNETX_SRC))\n"
        '[sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == "utils"]\n'
        "import utils\n"
        "if not Path(utils.__file__).resolve().is_relative_to(FUSIONNETX_SRC.resolve()):\n"
        '    raise ImportError(f"utils imported from {utils.__file__}, not the embedded copy")\n'
        f'print("FusionNetX utils {digest} unpacked to", FUSIONNETX_SRC)\n'
        "from utils.kaggle.input import check_versions\n" + gate
    )


def build_notebook(
    notebook: Path,
    parameters: dict[str, Any],
    owner: str | None = None,
    skip_version_check: bool = False,
) -> nbformat.NotebookNode:
    """The notebook with the bootstrap cell first and Kaggle parameters after `parameters`."""
    if not notebook.is_file():
        raise KaggleBuildError(f"notebook {notebook} does not exist (needed by its kernel)")
    nb = nbformat.read(notebook, as_version=4)
    cells = [c for c in nb.cells if INJECTED_TAG not in c.metadata.get("tags", [])]
    index = next((i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])), -1)
    if index < 0:
        raise KaggleBuildError(f"{notebook}: no cell tagged 'parameters'")
    injected = nbformat.v4.new_code_cell(injected_source(parameters, owner))
    code = [c.source for c in cells if c.cell_type == "code"] + [injected.source]
    archive = utils_archive(kernel_modules(code))
    injected.metadata["tags"] = [INJECTED_TAG]
    libraries = kernel_libraries(archive, code)
    bootstrap = nbformat.v4.new_code_cell(bootstrap_source(archive, libraries, skip_version_check))
    bootstrap.metadata["tags"] = [BOOTSTRAP_TAG]
    nb.cells = [bootstrap, *cells[: index + 1], injected, *cells[index + 1 :]]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb
