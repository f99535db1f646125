from vidt.models.build import build, build_detector, build_teacher  # noqa: F401
