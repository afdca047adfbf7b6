"""Safe YAML for recipes: ``!ModifierName`` tags without running code, with line numbers kept.

Numbers follow YAML 1.2, as recipe authors expect: ``8e-5`` is a float (PyYAML's YAML 1.1 reads a
string) and ``2:4`` is the string "2:4" (YAML 1.1 reads the base-60 integer 124).

A recipe comes from strangers, so its size is bounded before anything is read into Python: the text
(``MAX_BYTES``), the nodes it stands for once every alias is expanded (``MAX_NODES``: PyYAML shares
an aliased node, but every later walk of the data copies it, so ten aliases of ten aliases of ...
cost 10**n) and its nesting (``MAX_DEPTH``: every walk of the data recurses). Real SparseML recipes
are under 25 KB, a few thousand nodes and 6 levels deep.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import yaml

from ..errors import RecipeError
from ..modifiers.base import Modifier

INT, FLOAT, MAP = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:map"
MAX_BYTES = 2**20
MAX_NODES = 100_000
MAX_DEPTH = 50


class Map(dict):
    """A YAML mapping that remembers the line of each key (1-based), for error messages."""

    lines: dict


@dataclass
class Tagged:
    """A ``!Name`` mapping from the recipe, before it becomes a modifier."""

    name: str
    args: Map
    line: int


class Loader(yaml.SafeLoader):
    """SafeLoader that counts nodes as expanded (an alias counts as a copy of its anchor's node) and
    nesting while it composes, and stops at the first node past a bound, naming the top-level key."""

    def __init__(self, stream):
        super().__init__(stream)
        self.nodes = 0  # composed so far, aliases expanded
        self.depth = 0  # of the node being composed
        self.deepest = 0  # reached inside the node being composed
        self.extents: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, height) of its finished node
        self.key: yaml.ScalarNode | None = None  # the top-level key whose value is being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        if self.depth == 1:  # a key (index None) or value (index: its key) of the top-level mapping
            self.key = index if isinstance(index, yaml.ScalarNode) else None
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.anchors and event.anchor not in self.extents:
                self._refuse(f"alias *{event.anchor} is inside its own anchor (a recursive recipe)", event)
            nodes, height = self.extents.get(event.anchor, (0, 0))  # (an undefined alias: PyYAML says so)
            self._count(nodes, self.depth + height, event)
            return super().compose_node(parent, index)
        start, outer_deepest = self.nodes, self.deepest
        self.depth += 1
        self.deepest = self.depth
        self._count(1, self.depth, event)
        node = super().compose_node(parent, index)
        if event.anchor is not None:
            self.extents[event.anchor] = (self.nodes - start, self.deepest - self.depth + 1)
        self.depth -= 1
        self.deepest = max(outer_deepest, self.deepest)
        return node

    def _count(self, nodes: int, depth: int, event) -> None:
        self.nodes += nodes
        self.deepest = max(self.deepest, depth)
        if depth > MAX_DEPTH:
            self._refuse(f"nested more than {MAX_DEPTH} levels deep (aliases expanded); real recipes "
                         "nest about 6", event)
        if self.nodes > MAX_NODES:
            self._refuse(f"more than {MAX_NODES} YAML nodes with aliases expanded (an alias bomb?); "
                         "real recipes have a few thousand", event)

    def _refuse(self, reason: str, event):
        if self.key is None:
            raise yaml.composer.ComposerError(None, None, reason, event.start_mark)
        raise yaml.composer.ComposerError(None, None, f"{cut(self.key.value)}: {reason}", self.key.start_mark)

    def construct_object(self, node, deep=False):
        """PyYAML's scalar constructors raise plain ValueError (a date 2001-13-45, an int of 5000
        digits): give them the node's line like every other YAML error."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as err:
            raise yaml.constructor.ConstructorError(
                None, None, f"{brief(node.value) if isinstance(node, yaml.ScalarNode) else node.tag}: {err}",
                node.start_mark) from None


Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (INT, FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
Loader.add_implicit_resolver(
    FLOAT,
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _fill(loader: Loader, node: yaml.MappingNode, data: Map) -> None:
    data.update(loader.construct_mapping(node))
    data.lines = {loader.construct_object(key): key.start_mark.line + 1 for key, _ in node.value}


def _construct_map(loader: Loader, node: yaml.MappingNode):
    data = Map()
    yield data  # as PyYAML does, so that aliases may refer to a mapping being built
    _fill(loader, node, data)


def _construct_tagged(loader: Loader, suffix: str, node: yaml.Node):
    tagged = Tagged(name=suffix.removeprefix("pytorch."), args=Map(), line=node.start_mark.line + 1)
    tagged.args.lines = {}
    yield tagged
    if isinstance(node, yaml.MappingNode):
        _fill(loader, node, tagged.args)
    elif not (isinstance(node, yaml.ScalarNode) and node.value == ""):
        raise yaml.constructor.ConstructorError(
            None, None, f"!{suffix} must be followed by a mapping of its keys", node.start_mark)


Loader.add_constructor(MAP, _construct_map)
Loader.add_multi_constructor("!", _construct_tagged)


def parse(text: str, name: str):
    """The recipe's YAML as Python data, or RecipeError naming file:line."""
    check_size(len(text), name)
    loader = Loader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{name}{line}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{name}: {err}") from None
    finally:
        loader.dispose()


def check_size(size: int, name: str) -> None:
    """Refuse a recipe too long to be one, before parsing it (PyYAML reads about 100 KB/s)."""
    if size > MAX_BYTES:
        raise RecipeError(f"{name}: longer than {MAX_BYTES} bytes ({MAX_BYTES / 2**20:g} MiB); real recipes are "
                          "under 25 KB")


def brief(value) -> str:
    """``repr(value)`` for an error message: one line, never a megabyte."""
    return cut(repr(value))


def cut(text: str) -> str:
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


class Dumper(yaml.SafeDumper):
    pass


def _represent_modifier(dumper: Dumper, modifier: Modifier) -> yaml.MappingNode:
    """Every key, defaults too: a saved recipe must mean the same to a later version of distsparse."""
    items = {f.name: plain(getattr(modifier, f.name)) for f in dataclasses.fields(modifier) if f.init}
    return dumper.represent_mapping(f"!{type(modifier).__name__}", items)


def plain(value):
    """Builtin containers only (tuples become lists), so that the safe dumper accepts them."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


Dumper.add_multi_representer(Modifier, _represent_modifier)


def dump(data: dict) -> str:
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=False)
