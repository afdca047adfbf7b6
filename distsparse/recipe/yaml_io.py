"""Safe YAML for recipes: ``!ModifierName`` tags without running code, with line numbers kept.

Numbers follow YAML 1.2, as recipe authors expect: ``8e-5`` is a float (PyYAML's YAML 1.1 reads a
string) and ``2:4`` is the string "2:4" (YAML 1.1 reads the base-60 integer 124).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import yaml

from ..errors import RecipeError
from ..modifiers.base import Modifier

INT, FLOAT, MAP = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:map"


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
    pass


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
