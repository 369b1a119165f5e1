"""The import graph of cmaclip/, read with `ast` (nothing is imported): no cycle, no import up a layer.

LAYERS is where the layers are defined; ARCHITECTURE.md's "Layers" table must name the same ones
and its module map every module. Every import counts, a function's local import too; `importlib`
strings (cli.py's table) do not. Importing `a.b.c` is an edge to module a.b.c only: the parent
packages' __init__ files run too, but they hold no cmaclip imports of their own except
cmaclip/model/__init__.py, the model's front door.
"""
import ast
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "cmaclip"
ARCHITECTURE = PACKAGE_DIR.parent / "ARCHITECTURE.md"

# layer: (its modules: a name, or "package.*" for a package and everything in it; the layers it may
# import besides its own)
LAYERS = {
    "base": (["cmaclip", "cmaclip.errors", "cmaclip.files"], []),
    "data": (["cmaclip.data.*"], ["base"]),
    "model": (["cmaclip.model.*"], ["base"]),
    "core": (["cmaclip.config", "cmaclip.distributed", "cmaclip.checkpoint", "cmaclip.elastic", "cmaclip.resume",
              "cmaclip.runlock", "cmaclip.runlog", "cmaclip.guard", "cmaclip.telemetry", "cmaclip.metrics",
              "cmaclip.calibration", "cmaclip.pictures", "cmaclip.products"], ["base", "data", "model"]),
    "loops": (["cmaclip.train", "cmaclip.evaluate"], ["base", "data", "model", "core"]),
    "commands": (["cmaclip.pretrain", "cmaclip.predict", "cmaclip.batch_predict", "cmaclip.calibrate",
                  "cmaclip.explain", "cmaclip.ablate", "cmaclip.demo", "cmaclip.rendezvous"],
                 ["base", "data", "model", "core", "loops"]),
    "cli": (["cmaclip.cli", "cmaclip.__main__"], ["base", "data", "model", "core", "loops", "commands"]),
}


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under package_dir (a package is its __init__)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `module` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from a import b` imports module a.b when there is one, else a name defined in a
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a module a.b: the longest known prefix
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    names = module_names(package_dir)
    return {module: imported_modules(module, path, set(names)) for module, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def layer_of(module: str, layers: dict) -> str | None:
    for layer, (members, _) in layers.items():
        for member in members:
            package = member.removesuffix(".*")
            if module == package or (member.endswith(".*") and module.startswith(package + ".")):
                return layer
    return None


def layering_problems(graph: dict[str, set[str]], layers: dict) -> list[str]:
    """One line per module without a layer and per import of a layer the importer may not import."""
    problems = [f"{module} is in no layer: add it to LAYERS" for module in sorted(graph)
                if layer_of(module, layers) is None]
    for module in sorted(graph):
        own = layer_of(module, layers)
        for target in sorted(graph[module]):
            theirs = layer_of(target, layers)
            if own and theirs and theirs != own and theirs not in layers[own][1]:
                problems.append(f"{module} ({own}) imports {target} ({theirs}): {own} may import only "
                                f"{', '.join(layers[own][1]) or 'its own layer'}")
    return problems


def test_cmaclip_has_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE_DIR))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cmaclip_module_imports_up_a_layer():
    problems = layering_problems(import_graph(PACKAGE_DIR), LAYERS)
    assert not problems, "\n".join(problems)


def test_the_model_library_never_imports_the_trainer():
    """Whatever LAYERS says: cmaclip/model is a library of its own (ARCHITECTURE.md)."""
    outside = [f"{module} imports {target}" for module, targets in sorted(import_graph(PACKAGE_DIR).items())
               if layer_of(module, LAYERS) == "model" for target in sorted(targets)
               if layer_of(target, LAYERS) not in ("model", "base")]
    assert not outside, "\n".join(outside)


def documented_layers(text: str) -> dict:
    """ARCHITECTURE.md's "Layers" table in LAYERS' shape (module names without the `cmaclip`
    package itself, which the table leaves out)."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for row in re.findall(r"^\| (\w+) \| (.+?) \| (.+?) \|$", section, re.M):
        layer, modules, builds_on = row
        if layer == "layer":  # the header
            continue
        names = [name.strip().removesuffix(".py") for name in re.sub(r"\([^)]*\)", "", modules).split(",")]
        below = list(layers) if builds_on == "all of the above" else [
            name.strip() for name in builds_on.split(",") if name.strip() != "-"]
        layers[layer] = (["cmaclip." + name.replace("/", ".") for name in names], below)
    return layers


def test_architecture_md_names_the_layers_of_LAYERS():
    expected = {layer: ([m for m in members if m != "cmaclip"], below) for layer, (members, below) in LAYERS.items()}
    assert documented_layers(ARCHITECTURE.read_text()) == expected


def test_architecture_md_maps_every_module():
    """The module map (the first code block) has a line for every file of the package."""
    block = ARCHITECTURE.read_text().split("```")[1]
    mapped, folder = set(), ""
    for indent, name in re.findall(r"^( +)(\S+\.py|\S+/)(?= |$)", block, re.M):
        if name.endswith("/"):
            folder = name
        else:
            mapped.add(name if len(indent) == 2 else folder + name)
    files = {str(path.relative_to(PACKAGE_DIR)) for path in PACKAGE_DIR.rglob("*.py")
             if not path.name.startswith("__")}
    assert sorted(files - mapped) == [] and sorted(mapped - files) == []


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_a_cycle_through_a_local_relative_import_is_named(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "",
        "low.py": "def f():\n    from .sub import high\n",  # a function's local import counts
        "sub/__init__.py": "",
        "sub/high.py": "from pkg import low\n",
    })
    assert find_cycle(import_graph(package)) == ["pkg.low", "pkg.sub.high", "pkg.low"]


def test_an_import_up_a_layer_and_a_module_without_layer_are_reported(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "",
        "low.py": "import pkg.high.tool\n",
        "high/__init__.py": "",
        "high/tool.py": "from pkg.low import something\n",
        "stray.py": "",
    })
    layers = {"low": (["pkg", "pkg.low"], []), "high": (["pkg.high.*"], ["low"])}
    assert find_cycle(import_graph(package)) == ["pkg.high.tool", "pkg.low", "pkg.high.tool"]
    assert layering_problems(import_graph(package), layers) == [
        "pkg.stray is in no layer: add it to LAYERS",
        "pkg.low (low) imports pkg.high.tool (high): low may import only its own layer",
    ]
