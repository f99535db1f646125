"""The house's rules (ARCHITECTURE.md), checked on the source: one definition of each shared piece, the core
imports none of the trees, errors become exit codes only in entry points, and no ``sys.path`` edits."""
import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_MODULES = ("checkpoint", "config", "datasets", "distillers", "engine", "main_distributed", "models", "optim",
                "runtime", "export", "predict", "run_with_submitit")
TREES = ("vidt", "generation", "experiments", "benchmarks", "examples")
ENTRY_POINT_MODULES = ("main_distributed", "vidt.main", "generation.main", "export", "predict")


def source_files():
    """Every tracked-looking Python file outside tests/ (and the virtual environment)."""
    for folder, folders, files in os.walk(REPO):
        folders[:] = [name for name in folders if not name.startswith(".") and name not in ("tests", "runs", "data")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as handle:
                    yield os.path.relpath(path, REPO), handle.read()


SOURCES = dict(source_files())


def definitions(pattern: str):
    return sorted(path for path, text in SOURCES.items() for _ in re.finditer(pattern, text, flags=re.M))


@pytest.mark.parametrize("pattern, home", [
    (r"^def launcher_ranks\(", "vkd/distributed.py"),
    (r"^def join_process_group\(", "vkd/distributed.py"),
    (r"^class CheckpointError\(", "vkd/errors.py"),
    (r"^class DatasetError\(", "vkd/errors.py"),
    (r"^def strict_load\(", "vkd/checkpoints.py"),
    (r"^def save_atomically\(", "vkd/checkpoints.py"),
    (r"^def safe_torch_load\(", "vkd/checkpoints.py"),
    (r"^class Progress\b", "vkd/progress.py"),
    (r"^class \w*EMA\b", "vkd/ema.py"),
    (r"^RUN_FILES\b", "vkd/runs.py"),
    (r"^def prepare_output_dir\(", "vkd/runs.py"),
    (r"^def fail\(", "vkd/cli.py"),
    (r"^def config_file_defaults\(", "vkd/config.py"),
    (r"^class OrthogonalProjector\(", "vkd/projector.py"),
])
def test_each_shared_piece_has_one_definition(pattern, home):
    assert definitions(pattern) == [home]


def test_no_exception_ends_the_process_by_itself():
    assert definitions(r"^class \w+\([^)]*SystemExit") == []


def test_only_the_documented_shim_edits_the_import_path():
    assert sorted({path for path, text in SOURCES.items() if re.search(r"\bsys\.path\b", text)}) == ["vidt/main.py"]


def is_entry_point(text: str) -> bool:
    return 'if __name__ == "__main__":' in text


def test_only_entry_points_and_the_cli_module_end_the_process():
    enders = {path for path, text in SOURCES.items() if re.search(r"(?<![\w.])fail\(|\bsys\.exit\(", text)}
    assert sorted(path for path in enders if not is_entry_point(SOURCES[path]) and path != "vkd/cli.py") == []


def imported_modules(text: str):
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_the_core_imports_none_of_the_trees():
    for path, text in SOURCES.items():
        if path.startswith("vkd" + os.sep):
            foreign = [name for name in imported_modules(text) if name.split(".")[0] in ROOT_MODULES + TREES]
            assert foreign == [], path


def test_nothing_imports_an_entry_point():
    for path, text in SOURCES.items():
        assert not [name for name in imported_modules(text) if name in ENTRY_POINT_MODULES], path


def test_the_root_holds_no_experiment_driver():
    assert not [name for name in ("demo.py", "ablation.py", "fmnist.py", "demo_gen.py")
                if os.path.exists(os.path.join(REPO, name))]


@pytest.mark.parametrize("pattern, home", [
    (r"^def create_student\(", "models/__init__.py"),
    (r"^def create_teacher\(", "vkd/teachers.py"),
    (r"^def freeze\(", "vkd/frozen.py"),
    (r"^class Distiller\(", "distillers/base.py"),
    (r"^DISTILLERS\b", "distillers/__init__.py"),
    (r"^class TeacherCache\b", "distillers/teacher_cache.py"),
    (r"^def init_runtime\(", "runtime.py"),
    (r"^def load_student_checkpoint\(", "models/loading.py"),
    (r"^def is_distributed\(", "vkd/distributed.py"),
    (r"^def reduce_over_ranks\(", "vkd/distributed.py"),
    (r"^def every_rank\(", "vkd/distributed.py"),
    (r"^def full_fp32\(", "vkd/precision.py"),
    (r"^def feature_width\(", "vkd/losses.py"),
    (r"^def tensorboard_writer\(", "vkd/progress.py"),
    (r"^def append_json_line\(", "vkd/progress.py"),
])
def test_each_concern_of_the_classification_tree_has_one_home(pattern, home):
    assert definitions(pattern) == [home]


def test_a_teacher_is_frozen_one_way():
    # The EMA's average is frozen too, but it is no teacher.
    assert sorted({path for path, text in SOURCES.items() if "requires_grad_(False)" in text}) == [
        "vkd/ema.py", "vkd/frozen.py"]


def test_only_the_installed_package_registers_students_with_timm():
    assert sorted({path for path, text in SOURCES.items() if re.search(r"^@register_model", text, re.M)}) == [
        "vkd/models.py"]


def root_imports(path: str):
    return {name.split(".")[0] for name in imported_modules(SOURCES[path])} & set(ROOT_MODULES)


def test_the_root_modules_import_each_other_without_a_circle():
    modules = {}
    for path in SOURCES:
        module = path.split(os.sep)[0].removesuffix(".py")
        if module in ROOT_MODULES:
            modules.setdefault(module, set()).update(root_imports(path) - {module})
    visiting, done = set(), set()

    def visit(module, trail):
        assert module not in visiting, " -> ".join(trail + [module])
        if module in done:
            return
        visiting.add(module)
        for imported in sorted(modules.get(module, ())):
            visit(imported, trail + [module])
        visiting.discard(module)
        done.add(module)

    assert {"config", "datasets", "models", "distillers"} <= set(modules)
    for module in sorted(modules):
        visit(module, [])


def test_the_parser_is_composed_and_no_function_of_config_is_long():
    tree = ast.parse(SOURCES["config.py"])
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef)}
    assert max(lengths.values()) <= 60, lengths
    adders = {path for path, text in SOURCES.items() if re.search(r"^def add_arguments\(", text, re.M)}
    assert {"datasets.py", "models/build.py", "optim.py", "distillers/__init__.py"} <= adders


def test_nothing_writes_args_after_parsing():
    written = []
    for path, text in SOURCES.items():
        for node in ast.walk(ast.parse(text)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                        and target.value.id == "args":
                    written.append(f"{path}:{node.lineno}")
    # parse_arguments turns the original's "none" into None while it parses.
    assert [place for place in written if not place.startswith("config.py:")] == []
