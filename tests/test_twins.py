"""torch_impl and jax_impl alike by construction: both backends satisfy shared.backend.Backend with
the same methods and parameters, the twins have the same modules and the same functions with the
same parameters (or say why not), neither implementation imports the other, only the two train.py
import the loop, and no source file grows past MAX_LINES.

Each check is a function that returns what it found wrong, so the tests can also show that it
finds what a deliberately broken copy gets wrong.
"""
import ast
import inspect
from pathlib import Path

import pytest

from jax_impl import backend as jax_backend
from shared import backend as protocol
from torch_impl import backend as torch_backend

REPO = Path(__file__).resolve().parents[1]
TWINS = ("torch_impl", "jax_impl")
PACKAGES = ("shared", "torch_impl", "jax_impl", "interop")
# Which of our packages each may import: the data flows one way, and the implementations meet
# only in interop, above both.
ALLOWED_IMPORTS = {"shared": {"shared"}, "torch_impl": {"shared", "torch_impl"},
                   "jax_impl": {"shared", "jax_impl"},
                   "interop": {"shared", "torch_impl", "jax_impl", "interop"}}

# Names only one twin has, and why: the machinery of a framework, not an idea of the project.
ONE_SIDED = {
    "checkpoint": {"restore_opt_state": "optax's state is a tree to be rebuilt in the shape of "
                                        "optimizer.init; torch's optimizer loads its own"},
    "distributed": {
        "AllReduceSum": "torch's processes sum by hand; XLA partitions the jitted step",
        "FullGatherLayer": "ditto", "GlobalBatchNorm": "ditto", "gather_batch": "ditto",
        "data_parallel": "DistributedDataParallel wraps the torch model",
        "sync_batch_norm": "torch's BatchNorm is per process unless converted",
        "joined": "torch joins a process group; jax.distributed joins in world_from_env",
        "process_device": "one torch process per GPU; one jax process drives them all",
        "batch_sharding": "jax places arrays on a device mesh", "data_mesh": "ditto",
        "global_batch": "ditto", "replicate": "ditto", "replicated": "ditto",
        "distributed_env": "jax.distributed's own environment variables"},
    "model": {
        "layout_of": "torch's channels_last layout", "BatchNorm": "flax's BatchNorm is not "
        "torch's: this one is, with torch's names", "Conv": "torch's names and the im2col "
        "convolution", "Downsample": "flax modules name their children as torch's Sequential",
        "Stage": "ditto", "torch_uniform": "torch's default initialisation, written out",
        "default_conv_impl": "XLA:CPU's faster convolution",
        "backbone_variables": "a flax module's submodule is applied with its own variables",
        "variable_shapes": "flax's variables live outside it"},
    "optim": {"LARS": "a torch.optim.Optimizer", "LarsState": "optax: a transformation and its "
              "state", "scale_by_lars": "ditto", "lars": "ditto", "adam_l2": "ditto"},
    "runtime": {"autocast": "torch computes in bf16 through autocast; flax through its dtype",
                "use_compilation_cache": "XLA compiles every jitted program; torch's eager step "
                                         "has nothing to keep (inductor caches its own)",
                "memory_format": "torch's channels_last layout", "to_channels_last": "ditto"},
}
# Methods a framework calls itself, under its own names.
FRAMEWORK_HOOKS = {"forward": "torch.nn.Module's", "setup": "flax.linen.Module's"}
# Functions both twins have whose positional parameters differ, and why.
DIFFERENT_PARAMETERS = {
    "optim.set_lr": "torch sets the rate on its optimizer; optax returns a new optimizer state",
    "step.step_loss": "jax differentiates with respect to the params it is given",
    "probe.extract_features": "a torch module holds its weights, a flax module is applied to "
                              "variables",
    "probe.features_of": "ditto",
}


def protocol_members() -> dict[str, inspect.Signature | None]:
    """shared.backend.Backend's methods (name -> signature) and attributes (name -> None)."""
    members = {name: None for name in protocol.Backend.__annotations__}
    for name, member in vars(protocol.Backend).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            members[name] = inspect.signature(member)
    return members


def parameters(signature: inspect.Signature) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in signature.parameters.values()]


def protocol_problems(backend_class: type, instance: object) -> list[str]:
    """How `backend_class` (and an instance, for its attributes) departs from
    shared.backend.Backend: a missing member, or a method whose parameters are named or kinded
    otherwise."""
    problems = []
    for name, signature in protocol_members().items():
        if signature is None:
            if not hasattr(instance, name):
                problems.append(f"{backend_class.__module__}.Backend has no attribute {name}")
            continue
        method = getattr(backend_class, name, None)
        if not callable(method):
            problems.append(f"{backend_class.__module__}.Backend has no method {name}")
        elif parameters(inspect.signature(method)) != parameters(signature):
            problems.append(f"{backend_class.__module__}.Backend.{name}"
                            f"{inspect.signature(method)} is not the protocol's {signature}")
    return problems


def public_definitions(source: str) -> dict[str, list[str] | None]:
    """Top-level public functions (-> their positional parameter names), classes (-> None) and
    the public methods of classes ("Class.method" -> positional parameter names) of a module."""
    found: dict[str, list[str] | None] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            found[node.name] = [a.arg for a in node.args.posonlyargs + node.args.args]
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            found[node.name] = None
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    found[f"{node.name}.{item.name}"] = [
                        a.arg for a in item.args.posonlyargs + item.args.args]
    return found


def twin_problems(module: str, torch_source: str, jax_source: str) -> list[str]:
    """How two same-named twin modules differ: a public name one has and the other lacks (unless
    ONE_SIDED says why), or a function whose positional parameters differ (unless
    DIFFERENT_PARAMETERS says why)."""
    torch_defs, jax_defs = public_definitions(torch_source), public_definitions(jax_source)
    excused = ONE_SIDED.get(module, {})
    problems = []
    for name in sorted(set(torch_defs) ^ set(jax_defs)):
        owner, method = name.split(".")[0], name.split(".")[-1]
        if owner not in excused and method not in FRAMEWORK_HOOKS:
            side = "torch_impl" if name in torch_defs else "jax_impl"
            problems.append(f"{side}.{module}.{name} has no twin")
    for name in sorted(set(torch_defs) & set(jax_defs)):
        if torch_defs[name] != jax_defs[name] and f"{module}.{name}" not in DIFFERENT_PARAMETERS:
            problems.append(f"{module}.{name}: torch_impl takes {torch_defs[name]}, jax_impl "
                            f"{jax_defs[name]}")
    return problems


def imported_packages(source: str) -> set[str]:
    """The top-level packages a module's source imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def import_problems(package: str, sources: dict[str, str]) -> list[str]:
    """Imports of our packages that `package`'s modules (file name -> source) may not make."""
    return [f"{file} imports {imported}"
            for file, source in sorted(sources.items())
            for imported in sorted(imported_packages(source) & set(PACKAGES))
            if imported not in ALLOWED_IMPORTS[package]]


def module_imports(package: str, sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (anywhere in it), by name."""
    edges = {}
    for file, source in sources.items():
        name, found = Path(file).stem, set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module == package:
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {alias.name.split(".")[1] for alias in node.names
                          if alias.name.startswith(package + ".")}
        edges[name] = found - {name}
    return edges


def import_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One cycle of the import graph (its modules, the first repeated at the end), or []."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for imported in sorted(edges.get(module, ())):
            cycle = visit(imported, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return []

    for module in sorted(edges):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return []


# The modules that may import the training loop: the commands that run it.
LOOP_IMPORTERS = {"torch_impl/train.py", "jax_impl/train.py"}
# A file past this many lines holds more than one purpose (tests that mix topics included).
MAX_LINES = 500


def loop_importers(sources: dict[str, str]) -> list[str]:
    """The files (name -> source) that import shared.loop and are not LOOP_IMPORTERS."""
    found = []
    for file, source in sorted(sources.items()):
        for node in ast.walk(ast.parse(source)):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{alias.name}" for alias in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(name == "shared.loop" or name.startswith("shared.loop.") for name in names):
                found.append(file)
                break
    return [file for file in found if file not in LOOP_IMPORTERS]


def long_files(sources: dict[str, str]) -> list[str]:
    """The files (name -> source) of more than MAX_LINES lines, with their length."""
    lines = {file: source.count("\n") for file, source in sources.items()}
    return [f"{file}: {count} lines" for file, count in sorted(lines.items()) if count > MAX_LINES]


def package_sources(package: str) -> dict[str, str]:
    return {str(path.relative_to(REPO)): path.read_text()
            for path in sorted((REPO / package).rglob("*.py"))}


# ---- the contract --------------------------------------------------------------------------------

def backends(tmp_path):
    """An instance of each framework's Backend for the smoke preset on the CPU (nothing is
    compiled)."""
    import jax
    import numpy as np
    import torch

    from shared.augment import view_params
    from shared.config import make_config
    from shared.data import CIFAR10_MEAN, CIFAR10_STD

    cfg = make_config({"preset": "smoke", "out": str(tmp_path)})
    images = np.zeros((64, 32, 32, 3), np.uint8)
    augment = view_params(cfg, CIFAR10_MEAN, CIFAR10_STD)
    return {torch_backend.Backend: torch_backend.Backend(cfg, protocol.World(), images, augment,
                                                         torch.device("cpu")),
            jax_backend.Backend: jax_backend.Backend(cfg, protocol.World(), images, augment,
                                                     jax.devices()[0])}


def test_both_backends_satisfy_the_loops_protocol(tmp_path):
    for backend_class, instance in backends(tmp_path).items():
        assert protocol_problems(backend_class, instance) == []
    assert (inspect.signature(torch_backend.open_backend)
            == inspect.signature(jax_backend.open_backend))


def test_the_twins_have_the_same_modules_and_functions():
    names = {twin: sorted(p.stem for p in (REPO / twin).glob("*.py")) for twin in TWINS}
    assert names["torch_impl"] == names["jax_impl"]
    problems = [problem for module in names["torch_impl"] for problem in twin_problems(
        module, *((REPO / twin / f"{module}.py").read_text() for twin in TWINS))]
    assert problems == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_what_lies_above_it(package):
    assert import_problems(package, package_sources(package)) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_the_modules_of_a_package_import_one_way(package):
    """No cycle inside a package either, lazy imports included (shared: config -> data -> loader
    -> backend -> records -> run folder -> budget -> loop -> results -> report; docs/design.md
    draws it)."""
    assert import_cycle(module_imports(package, package_sources(package))) == []


def test_only_the_trainers_import_the_loop():
    sources = {file: text for package in (*PACKAGES, "bench") for file, text
               in package_sources(package).items()}
    assert loop_importers(sources) == []


def test_no_source_file_is_longer_than_its_purpose():
    sources = {file: text for package in (*PACKAGES, "bench", "tests", "parity_tests")
               for file, text in package_sources(package).items()}
    assert long_files(sources) == []


# ---- the checks find what a broken copy gets wrong -----------------------------------------------

def test_the_protocol_check_finds_a_missing_or_respelled_method(tmp_path):
    instance = backends(tmp_path)[torch_backend.Backend]

    class Respelled(torch_backend.Backend):
        def train_step(self, state, views, lr):  # `batch` named otherwise
            return super().train_step(state, views, lr)

    missing = type("Missing", (), {k: v for k, v in vars(torch_backend.Backend).items()
                                   if k != "scratch_copy"})
    assert protocol_problems(Respelled, instance) == [
        f"{Respelled.__module__}.Backend.train_step(self, state, views, lr) is not the "
        "protocol's (self, state: 'Any', batch: 'ViewBatch | DrawnBatch', lr: 'float') -> "
        "'tuple[Any, dict]'"]
    assert protocol_problems(missing, instance) == [
        f"{missing.__module__}.Backend has no method scratch_copy"]


def test_the_twin_check_finds_a_function_one_side_lacks_or_spells_otherwise():
    torch_source = ("def build_optimizer(cfg, *, model):\n    pass\n\n"
                    "def set_warmup(cfg):\n    pass\n")
    jax_source = "def build_optimizer(config):\n    pass\n"
    assert twin_problems("optim", torch_source, jax_source) == [
        "torch_impl.optim.set_warmup has no twin",
        "optim.build_optimizer: torch_impl takes ['cfg'], jax_impl ['config']"]


def test_the_import_check_finds_a_lazy_import_of_the_other_twin():
    source = ("import numpy\n\ndef load(path):\n"
              "    from jax_impl.checkpoint import load_checkpoint\n"
              "    return load_checkpoint(path)\n")
    assert import_problems("torch_impl", {"torch_impl/api.py": source}) == [
        "torch_impl/api.py imports jax_impl"]
    assert import_problems("shared", {"shared/x.py": "import interop.api\n"}) == [
        "shared/x.py imports interop"]


def test_the_loop_check_finds_an_import_of_the_loop_outside_the_trainers():
    sources = {"torch_impl/train.py": "from shared.loop import run\n",
               "torch_impl/backend.py": "def f():\n    from shared.loop import World\n",
               "bench/x.py": "import shared.loop\n", "shared/data.py": "from shared import y\n"}
    assert loop_importers(sources) == ["bench/x.py", "torch_impl/backend.py"]
    assert long_files({"a.py": "x\n" * MAX_LINES, "b.py": "x\n" * (MAX_LINES + 1)}) == [
        f"b.py: {MAX_LINES + 1} lines"]


def test_the_cycle_check_finds_a_lazy_import_back():
    sources = {"shared/config.py": "from shared.errors import UserError\n",
               "shared/data.py": "from shared.config import IMAGE_SIZE\n",
               "shared/errors.py": ("def explain():\n"
                                    "    from shared import data\n"
                                    "    return data\n")}
    edges = module_imports("shared", sources)
    assert edges == {"config": {"errors"}, "data": {"config"}, "errors": {"data"}}
    assert import_cycle(edges) == ["config", "errors", "data", "config"]
    del sources["shared/errors.py"]
    assert import_cycle(module_imports("shared", sources)) == []
