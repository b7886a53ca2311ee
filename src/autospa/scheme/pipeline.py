"""RELION's project pipeline (``default_pipeline.star``) as a value: job counter, processes,
nodes and edges; parse, write and the few changes a scheme runner makes.

Job directories are named as RELION names them: ``<Type>/jobNNN/`` with a project-wide counter
(``Import/job001/``, ``MotionCorr/job002/``...); :func:`process_directory` gives ``<Type>`` for a
job type label.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, replace

from autospa.errors import InputError
from autospa.scheme.star_format import StarBlock, format_star, parse_star_text

#: Process status labels as RELION-4.0 writes them.
RUNNING, SCHEDULED, SUCCEEDED, FAILED, ABORTED = "Running", "Scheduled", "Succeeded", "Failed", "Aborted"
STATUSES = (RUNNING, SCHEDULED, SUCCEEDED, FAILED, ABORTED)

#: Job type family (second word of ``relion.<family>...``) -> RELION's directory name.
PROCESS_DIRECTORIES = {
    "import": "Import",
    "motioncorr": "MotionCorr",
    "ctffind": "CtfFind",
    "manualpick": "ManualPick",
    "autopick": "AutoPick",
    "extract": "Extract",
    "select": "Select",
    "class2d": "Class2D",
    "class3d": "Class3D",
    "refine3d": "Refine3D",
    "initialmodel": "InitialModel",
    "maskcreate": "MaskCreate",
    "joinstar": "JoinStar",
    "subtract": "Subtract",
    "postprocess": "PostProcess",
    "localres": "LocalRes",
    "multibody": "MultiBody",
    "polish": "Polish",
    "ctfrefine": "CtfRefine",
    "external": "External",
}


def process_directory(type_label: str) -> str:
    """RELION's directory for a job type: ``relion.motioncorr.own`` -> ``MotionCorr``
    (``External`` for types RELION does not know)."""
    parts = type_label.split(".")
    family = parts[1] if len(parts) > 1 and parts[0] == "relion" else ""
    return PROCESS_DIRECTORIES.get(family, "External")


#: (file name pattern, node type, append the job family) used to label nodes as RELION-4.0 does
#: (``ParticleGroupMetadata.star.relion.class2d``, ``MicrographGroupMetadata.star.relion.ctf``).
_NODE_TYPES = (
    ("movies.star", "MicrographMovieGroupMetadata.star.relion", False),
    ("corrected_micrographs.star", "MicrographGroupMetadata.star.relion.motioncorr", False),
    ("micrographs_ctf.star", "MicrographGroupMetadata.star.relion.ctf", False),
    ("micrographs*.star", "MicrographGroupMetadata.star.relion", False),
    ("autopick.star", "MicrographCoordsGroup.star.relion.autopick", False),
    ("class_averages.star", "ImagesData.star.relion.classaverages", False),
    ("*_optimiser.star", "OptimiserData.star.relion", True),
    ("*_data.star", "ParticleGroupMetadata.star.relion", True),
    ("particles*.star", "ParticleGroupMetadata.star.relion", False),
    ("*half1*unfil.mrc", "DensityMap.mrc.relion.halfmap", True),
    ("*.mrc", "DensityMap.mrc.relion", True),
    ("*.mrcs", "Image2DStack.mrcs.relion", True),
    ("*.pdf", "LogFile.pdf.relion", True),
    ("*.star", "ProcessData.star.relion", True),
)


def node_type_label(path: str, type_label: str = "") -> str:
    """RELION-4.0 style node type label for an output file of a job of ``type_label``."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    parts = type_label.split(".")
    family = parts[1] if len(parts) > 1 and parts[0] == "relion" else ""
    for pattern, label, append in _NODE_TYPES:
        if fnmatch.fnmatch(name, pattern):
            return f"{label}.{family}" if append and family else label
    return "ProcessData.txt"


@dataclass(frozen=True)
class PipelineProcess:
    """One job of the project: ``Class2D/job012/``, its alias, type label and status."""

    name: str
    type_label: str
    status: str
    alias: str = "None"


@dataclass(frozen=True)
class Pipeline:
    """``default_pipeline.star``: the next job number, processes, nodes and edges."""

    job_counter: int = 1
    processes: tuple[PipelineProcess, ...] = ()
    nodes: tuple[tuple[str, str], ...] = ()  # (node name, node type label)
    input_edges: tuple[tuple[str, str], ...] = ()  # (node, process)
    output_edges: tuple[tuple[str, str], ...] = ()  # (process, node)

    def process(self, name: str) -> PipelineProcess | None:
        """The process called ``name`` (``Class2D/job012/``), or ``None``."""
        for p in self.processes:
            if p.name == name:
                return p
        return None


def pipeline_from_text(text: str, source: str | None = None) -> Pipeline:
    """Parse ``default_pipeline.star`` text (RELION 3.1 / 4.0 / 5.0 layouts).

    Raises
    ------
    InputError
        No ``data_pipeline_general`` block or a malformed table.
    """
    blocks = parse_star_text(text, source)
    general = blocks.get("pipeline_general")
    if general is None or not general.rows:
        raise InputError(source, "no data_pipeline_general block: not a pipeline STAR file")
    try:
        counter = int(float(general.records()[0].get("rlnPipeLineJobCounter", 1)))
    except ValueError:
        raise InputError(source, "_rlnPipeLineJobCounter is not a number") from None

    def col(block: str, label: str) -> list[str]:
        b = blocks.get(block)
        if b is None:
            return []
        if label not in b.labels:
            raise InputError(source, f"data_{block} has no _{label} column")
        return [str(v) for v in b.column(label)]

    names = col("pipeline_processes", "rlnPipeLineProcessName")
    aliases = col("pipeline_processes", "rlnPipeLineProcessAlias") if names else []
    types = col("pipeline_processes", "rlnPipeLineProcessTypeLabel") if names else []
    statuses = col("pipeline_processes", "rlnPipeLineProcessStatusLabel") if names else []
    processes = tuple(
        PipelineProcess(n, t, s, a) for n, a, t, s in zip(names, aliases, types, statuses, strict=True)
    )
    node_names = col("pipeline_nodes", "rlnPipeLineNodeName")
    node_types = col("pipeline_nodes", "rlnPipeLineNodeTypeLabel") if node_names else []
    inputs = list(
        zip(col("pipeline_input_edges", "rlnPipeLineEdgeFromNode"), col("pipeline_input_edges", "rlnPipeLineEdgeProcess"), strict=True)
    )
    outputs = list(
        zip(col("pipeline_output_edges", "rlnPipeLineEdgeProcess"), col("pipeline_output_edges", "rlnPipeLineEdgeToNode"), strict=True)
    )
    return Pipeline(counter, processes, tuple(zip(node_names, node_types, strict=True)), tuple(inputs), tuple(outputs))


def pipeline_to_text(p: Pipeline) -> str:
    """The ``default_pipeline.star`` text RELION-4.0 writes."""
    blocks = [StarBlock("pipeline_general", loop=False, labels=["rlnPipeLineJobCounter"], rows=[[p.job_counter]])]
    if p.processes:
        blocks.append(
            StarBlock(
                "pipeline_processes",
                loop=True,
                labels=[
                    "rlnPipeLineProcessName",
                    "rlnPipeLineProcessAlias",
                    "rlnPipeLineProcessTypeLabel",
                    "rlnPipeLineProcessStatusLabel",
                ],
                rows=[[x.name, x.alias, x.type_label, x.status] for x in p.processes],
            )
        )
    if p.nodes:
        blocks.append(
            StarBlock(
                "pipeline_nodes",
                loop=True,
                labels=["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel", "rlnPipeLineNodeTypeLabelDepth"],
                rows=[[n, t, 1] for n, t in p.nodes],
            )
        )
    if p.input_edges:
        blocks.append(
            StarBlock(
                "pipeline_input_edges",
                loop=True,
                labels=["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"],
                rows=[list(e) for e in p.input_edges],
            )
        )
    if p.output_edges:
        blocks.append(
            StarBlock(
                "pipeline_output_edges",
                loop=True,
                labels=["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"],
                rows=[list(e) for e in p.output_edges],
            )
        )
    return format_star(blocks)


def add_process(
    p: Pipeline,
    directory: str,
    type_label: str,
    status: str = RUNNING,
    taken: Callable[[str], bool] = lambda name: False,
) -> tuple[Pipeline, str]:
    """Allocate the next job directory ``<directory>/jobNNN/`` and add it as a process.

    ``taken(name)`` says whether a name is unavailable for another reason (its directory exists).

    Returns
    -------
    (Pipeline, str)
        The new pipeline and the process name (``MotionCorr/job002/``).
    """
    counter = p.job_counter
    names = {x.name for x in p.processes}
    name = f"{directory}/job{counter:03d}/"
    while name in names or taken(name):  # a hand-edited counter must not reuse a name
        counter += 1
        name = f"{directory}/job{counter:03d}/"
    proc = PipelineProcess(name, type_label, status)
    return replace(p, job_counter=counter + 1, processes=p.processes + (proc,)), name


def set_process(p: Pipeline, name: str, status: str, type_label: str | None = None) -> Pipeline:
    """Set a process's status (adding the process if the pipeline does not have it yet)."""
    if status not in STATUSES:
        raise ValueError(f"unknown process status {status!r}")
    procs = list(p.processes)
    for i, x in enumerate(procs):
        if x.name == name:
            procs[i] = replace(x, status=status, type_label=type_label or x.type_label)
            return replace(p, processes=tuple(procs))
    return replace(p, processes=p.processes + (PipelineProcess(name, type_label or "relion.external", status),))


def add_input_edge(p: Pipeline, node: str, process: str, node_type: str) -> Pipeline:
    """Record that ``process`` reads ``node`` (adding the node if it is new)."""
    nodes = p.nodes if any(n == node for n, _ in p.nodes) else p.nodes + ((node, node_type),)
    edges = p.input_edges if (node, process) in p.input_edges else p.input_edges + ((node, process),)
    return replace(p, nodes=nodes, input_edges=edges)


def add_output_node(p: Pipeline, process: str, node: str, node_type: str) -> Pipeline:
    """Record that ``process`` wrote ``node``."""
    nodes = p.nodes if any(n == node for n, _ in p.nodes) else p.nodes + ((node, node_type),)
    edges = p.output_edges if (process, node) in p.output_edges else p.output_edges + ((process, node),)
    return replace(p, nodes=nodes, output_edges=edges)
