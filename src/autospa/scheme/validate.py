"""Checks that a scheme can run, before anything runs.

:func:`validate_scheme` checks the graph and the operators: every operator type exists and gets
variables of the kinds it takes, every edge joins existing nodes, every fork tests a boolean
variable, no node has two outgoing edges, and every node is reachable from the start node.
:func:`validate_job_templates` checks the job templates against the scheme: one per job node, and
every ``$$variable`` they use exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from autospa.errors import InputError
from autospa.scheme.model import UNDEFINED, JobTemplate, Scheme, VarKind
from autospa.scheme.operators import OPERATORS, Slot

_DOLLARS = re.compile(r"\$\$(\S+)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_slot(scheme: Scheme, op_name: str, op_type: str, which: str, ref: str | None, slot: Slot, source) -> None:
    where = f"operator {op_name} ({op_type})"
    if not slot.used:
        if ref is not None:
            raise InputError(source, f"{where} takes no {which}, but is given {ref!r}")
        return
    if ref is None:
        if slot.required:
            raise InputError(source, f"{where} needs {which}")
        return
    var = scheme.variables.get(ref)
    if var is None:
        if slot.number and _is_number(ref):
            return
        raise InputError(source, f"{where}: {which} {ref!r} is not a variable of the scheme")
    if slot.any_kind:
        return
    if var.kind not in slot.kinds:
        wanted = " or ".join(sorted(k.value for k in slot.kinds))
        raise InputError(source, f"{where}: {which} {ref!r} is a {var.kind.value} variable, not {wanted}")


def validate_scheme(scheme: Scheme, source: str | None = None, allow_unreachable: bool = False) -> None:
    """Raise :class:`InputError` (naming ``source``) if ``scheme`` cannot run.

    Parameters
    ----------
    scheme
        The scheme.
    source
        The scheme.star path, for messages.
    allow_unreachable
        Accept nodes that no path from the start node reaches (RELION's own proc scheme has one,
        ``HAS_topaz_model``); by default they are an error.
    """
    nodes = scheme.node_names()
    for name, op in scheme.operators.items():
        spec = OPERATORS.get(op.type)
        if spec is None:
            raise InputError(source, f"operator {name} has unknown type {op.type!r}")
        _check_slot(scheme, name, op.type, "an output", op.output, spec.output, source)
        _check_slot(scheme, name, op.type, "input1", op.input1, spec.input1, source)
        _check_slot(scheme, name, op.type, "input2", op.input2, spec.input2, source)
    if not scheme.edges:
        raise InputError(source, "the scheme has no edges (its first edge's input node is where it starts)")
    outgoing: dict[str, int] = {}
    for i, e in enumerate(scheme.edges, start=1):
        what = f"edge {i} ({e.source} -> {e.target})"
        if e.source not in nodes:
            raise InputError(source, f"{what} starts at {e.source!r}, which is not a node of the scheme")
        if e.target not in nodes:
            raise InputError(source, f"{what} goes to {e.target!r}, which is not a node of the scheme")
        if e.source in outgoing:
            raise InputError(source, f"node {e.source} has two outgoing edges (edges {outgoing[e.source]} and {i})")
        outgoing[e.source] = i
        if e.is_fork:
            if e.target_if_true is None or e.target_if_true not in nodes:
                raise InputError(source, f"fork at {e.source}: true target {e.target_if_true!r} is not a node")
            var = scheme.variables.get(e.bool_variable or "")
            if var is None:
                raise InputError(source, f"fork at {e.source}: {e.bool_variable!r} is not a variable of the scheme")
            if var.kind is not VarKind.BOOL:
                raise InputError(
                    source, f"fork at {e.source}: variable {e.bool_variable!r} is a {var.kind.value}, not a bool"
                )
    if scheme.current_node != UNDEFINED and scheme.current_node not in nodes:
        raise InputError(source, f"current node {scheme.current_node!r} is not a node of the scheme")
    if not allow_unreachable:
        seen = {scheme.start_node}
        todo = [scheme.start_node]
        succ = {}
        for e in scheme.edges:
            succ[e.source] = [e.target] + ([e.target_if_true] if e.is_fork and e.target_if_true else [])
        while todo:
            n = todo.pop()
            for m in succ.get(n, []):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        unreachable = sorted(nodes - seen)
        if unreachable:
            raise InputError(
                source,
                f"node(s) {', '.join(unreachable)} cannot be reached from the start node {scheme.start_node} "
                "(remove them, or allow unreachable nodes: autospa schemer --allow_unreachable)",
            )


def template_variables(template: JobTemplate) -> set[str]:
    """Names of the ``$$variables`` a template's options use."""
    out: set[str] = set()
    for value in template.options.values():
        out.update(_DOLLARS.findall(value))
    return out


def validate_job_templates(
    scheme: Scheme, templates: Mapping[str, JobTemplate | None], source: str | None = None
) -> None:
    """Raise :class:`InputError` if a job node has no template or a template uses an unknown variable.

    Parameters
    ----------
    scheme
        The scheme.
    templates
        Job node name -> its template (``None`` when the file is missing).
    source
        The scheme folder, for messages.
    """
    for name in scheme.jobs:
        tpl = templates.get(name)
        if tpl is None:
            raise InputError(source, f"job {name} has no template {name}/job.star")
        for var in sorted(template_variables(tpl)):
            if var not in scheme.variables:
                raise InputError(source, f"{name}/job.star uses $${var}, which is not a variable of the scheme")
