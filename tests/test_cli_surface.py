"""The command surface, frozen: flat verbs for actions, a noun group only where it holds several verbs. A new
command or a renamed one is a deliberate change to this list (and to the README's convention)."""
from moelab.cli import build_parser

SURFACE = {
    "analyze": None, "bench": None, "compare": None, "compress": None, "demo": None, "eval": None, "export": None,
    "finetune": None, "generate": None, "import": None, "place": None, "plot": None, "trace": None, "train": None,
    "upcycle": None,
    "lora": ["experts", "merge"], "offload": ["generate", "pregate", "simulate"],
}


def _surface(parser) -> dict:
    sub = parser._subparsers._group_actions[0]
    out = {}
    for name, sp in sub.choices.items():
        groups = [a for a in sp._actions if a.__class__.__name__ == "_SubParsersAction"]
        out[name] = sorted(groups[0].choices) if groups else None
    return out


def test_command_surface_is_frozen():
    assert _surface(build_parser()) == SURFACE


def test_every_command_has_help_and_a_description():
    sub = build_parser()._subparsers._group_actions[0]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, sp in sub.choices.items():
        assert helps.get(name), f"moelab {name} has no help line"
        assert sp.description, f"moelab {name} --help has no description"
