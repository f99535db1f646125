"""The house's rules (ARCHITECTURE.md), checked on the source: one definition of each shared piece and one home for
each concern the three trees share (the feature term, collectives, the resume rule, the checkpoint saver, 'this flag
has no effect', the map of trees to commands), the core imports none of the trees, detection and generation import
no classification module, errors become exit codes only in entry points, no ``sys.path`` edits, and the test suite
keeps only failed tests' folders."""
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
    (r"^def create_student\(", "models/__init__.py"),
    (r"^def create_teacher\(", "vkd/teachers.py"),
    (r"^def freeze\(", "vkd/frozen.py"),
    (r"^class Distiller\(", "distillers/base.py"),
    (r"^DISTILLERS\b", "distillers/__init__.py"),
    (r"^class TeacherCache\b", "distillers/teacher_cache.py"),
    (r"^def load_student_checkpoint\(", "models/loading.py"),
    (r"^def is_distributed\(", "vkd/distributed.py"),
    (r"^def reduce_over_ranks\(", "vkd/distributed.py"),
    (r"^def every_rank\(", "vkd/distributed.py"),
    (r"^def full_fp32\(", "vkd/precision.py"),
    (r"^def feature_width\(", "vkd/losses.py"),
    (r"^def tensorboard_writer\(", "vkd/progress.py"),
    (r"^def append_json_line\(", "vkd/progress.py"),
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


def test_a_teacher_is_frozen_one_way():
    # The EMA's average is frozen too, but it is no teacher.
    assert sorted({path for path, text in SOURCES.items() if "requires_grad_(False)" in text}) == [
        "vkd/ema.py", "vkd/frozen.py"]


def test_only_the_installed_package_registers_students_with_timm():
    assert sorted({path for path, text in SOURCES.items() if re.search(r"^@register_model", text, re.M)}) == [
        "vkd/models.py"]


def module_name(path: str) -> str:
    """``models/build.py`` -> ``models.build``; a package's ``__init__.py`` -> the package."""
    return path.removesuffix(".py").removesuffix(os.sep + "__init__").replace(os.sep, ".")


def root_imports(path: str):
    """The root modules ``path`` imports, with the packages that importing them runs first (but for the packages
    ``path`` itself belongs to, which are being imported already)."""
    own = module_name(path).split(".")
    enclosing = {".".join(own[:end]) for end in range(1, len(own))}
    found = set()
    for name in imported_modules(SOURCES[path]):
        parts = name.split(".")
        if parts[0] in ROOT_MODULES:
            found.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return found - enclosing


def test_the_root_modules_import_each_other_without_a_circle():
    modules = {module_name(path): root_imports(path) for path in SOURCES
               if module_name(path).split(".")[0] in ROOT_MODULES}
    modules = {module: {name for name in imported if name in modules and name != module}
               for module, imported in modules.items()}
    visiting, done = set(), set()

    def visit(module, trail):
        assert module not in visiting, " -> ".join(trail + [module])
        if module in done:
            return
        visiting.add(module)
        for imported in sorted(modules[module]):
            visit(imported, trail + [module])
        visiting.discard(module)
        done.add(module)

    assert {"config", "datasets", "models.build", "distillers"} <= set(modules)
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


EVERYWHERE = ROOT_MODULES + TREES + ("vkd",)


def uses(pattern: str, trees=("vkd", "vidt", "generation")):
    """The files under ``trees`` (folders, or modules without '.py'; vkd and the two trees by default) whose source
    matches ``pattern``."""
    return sorted(path for path, text in SOURCES.items() if re.search(pattern, text, flags=re.M)
                  and any(path.removesuffix(".py") == tree or path.startswith(tree + os.sep) for tree in trees))


def test_the_feature_term_has_one_home():
    """Detection and generation call vkd.losses.feature_distillation_loss; none computes its own distance."""
    assert uses(r"smooth_l1_loss|mse_loss") == ["vkd/losses.py"]
    assert uses(r"^def feature_distillation_loss\(") == ["vkd/losses.py"]
    assert uses(r"^NORMALISATIONS\b") == ["vkd/norms.py"]
    assert uses(r"\bfeature_distillation_loss\(", ("vidt", "generation")) == [
        "generation/distillation.py", "vidt/models/criterion.py"]


def test_collectives_and_the_end_of_a_process_group_have_one_home():
    """Every tree reaches the process group through vkd.distributed, and its entry point runs in
    ``ending_the_process_group``: one wording of a communication failure, one teardown."""
    assert uses(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|barrier|get_world_size|get_rank|is_initialized|"
                r"destroy_process_group)\b|is_communication_failure\(", EVERYWHERE) == ["vkd/distributed.py"]
    assert definitions(r"^def (is_dist_avail_and_initialized|get_world_size|get_rank|reduce_dict)\(") == []
    for name in ("is_distributed", "reduce_over_ranks", "mean_over_ranks", "every_rank", "is_main_process",
                 "ending_the_process_group"):
        assert definitions(rf"^def {name}\(") == ["vkd/distributed.py"], name
    assert uses(r"with ending_the_process_group\(", EVERYWHERE) == [
        "generation/main.py", "main_distributed.py", "vidt/main.py"]


def test_is_this_resume_the_same_run_has_one_rule():
    """The three trees refuse a resume of another run with vkd.runs.refuse_a_different_run and a deny list of
    the flags that define a run; none keeps an allow list of its own."""
    assert definitions(r"^def refuse_a_different_run\(") == ["vkd/runs.py"]
    assert uses(r"\brefuse_a_different_run\(", EVERYWHERE) == [
        "checkpoint.py", "generation/checkpointing.py", "vidt/arguments.py", "vkd/runs.py"]
    assert uses(r"MAY_CHANGE|check_same_run", EVERYWHERE) == []


def test_one_checkpoint_saver_for_the_three_trees():
    """Each tree names its files for vkd.saver.CheckpointSaver, which alone refuses non-finite weights, checks the
    room before a run and writes a run's checkpoints (atomically)."""
    assert definitions(r"^class CheckpointSaver\b") == ["vkd/saver.py"]
    assert uses(r"\bCheckpointSaver\(", EVERYWHERE) == [
        "checkpoint.py", "generation/checkpointing.py", "vidt/util/checkpoint.py"]
    assert uses(r"\b(all_finite|require_room_for_checkpoints)\(", EVERYWHERE) == ["vkd/checkpoints.py", "vkd/saver.py"]
    assert uses(r"\bsave_atomically\(", ("checkpoint", "generation", os.path.join("vidt", "util"))) == []
    assert uses(r"\bestimated_checkpoint_bytes\(", EVERYWHERE) == [
        "checkpoint.py", "generation/main.py", "vidt/main.py", "vkd/saver.py"]


def test_this_flag_has_no_effect_is_one_mechanism():
    """Classification's modules and detection state NoEffect rules; vkd.config.refuse_flags_without_effect alone
    applies them."""
    assert definitions(r"^class NoEffect\b") == ["vkd/config.py"]
    assert definitions(r"^def refuse_flags_without_effect\(") == ["vkd/config.py"]
    assert uses(r"\brefuse_flags_without_effect\(", EVERYWHERE) == [
        "config.py", "main_distributed.py", "vidt/arguments.py", "vkd/config.py"]
    assert definitions(r"^(INERT_FLAGS|UNSUPPORTED_OPTIONS|DASHED_FLAGS|NOT_APPLICABLE)\b") == []


def test_the_map_of_trees_to_commands_has_one_home():
    """vkd.cli.ENTRY_POINTS, read by run_with_submitit.py and experiments' runner: each names an entry point."""
    from vkd.cli import ENTRY_POINTS
    assert definitions(r"^ENTRY_POINTS\b") == ["vkd/cli.py"]
    assert uses(r"\bENTRY_POINTS\b", EVERYWHERE) == [
        "experiments/runner.py", "run_with_submitit.py", "vkd/cli.py"]
    for tree, (program, _) in ENTRY_POINTS.items():
        path = program[0] if program[0].endswith(".py") else program[-1].replace(".", os.sep) + ".py"
        assert is_entry_point(SOURCES[path]), tree


CLASSIFICATION_MODULES = ("checkpoint", "config", "datasets", "distillers", "engine", "main_distributed", "models",
                          "optim", "runtime", "export", "predict")


def classification_imports(text: str):
    return [name for name in imported_modules(text) if name.split(".")[0] in CLASSIFICATION_MODULES]


def test_detection_and_generation_import_no_classification_module():
    assert classification_imports("import models\nfrom datasets import build_dataset\nfrom vidt.models import build")\
        == ["models", "datasets"]  # the check sees both forms, and a tree's own models/ is not the root's
    for path, text in SOURCES.items():
        if path.split(os.sep)[0] in ("vidt", "generation"):
            assert classification_imports(text) == [], path


def test_files_say_what_they_hold():
    assert len(SOURCES["generation/main.py"].splitlines()) <= 350
    assert not [path for path in ("generation/vkd.py", "vidt/util/misc.py") if path in SOURCES]


def test_the_suite_keeps_only_failed_tests_folders(pytestconfig):
    """Many tests write real checkpoints: keeping every test's tmp_path (pytest's default, for three sessions) filled
    the disk of a CI machine with 8 GB a session, and the next tier failed on 'No space left on device'."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
