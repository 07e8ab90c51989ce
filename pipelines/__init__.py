"""Pipelines that execute an augmentation plan (installed as fastdeit.pipelines).

Imported as bare `pipelines` (Python started in the repository root finds this folder first), it
gives way to the installed distribution of that name: fastdeit.runtime.shadowing."""

if "." not in __name__:
    from fastdeit.runtime.shadowing import give_way

    give_way(__name__, __path__[0])
