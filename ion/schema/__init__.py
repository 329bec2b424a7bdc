"""The config decoder (docs/CONTRACTS.md's field conventions): decode.py builds and
validates dataclass trees, files.py reads YAML files with `extends:`, overrides.py
applies `-o key=value`, plain.py writes trees back out. Import from here."""
from ion.schema.decode import Origin, bounds_text, build, describe_type, display_path, field_default, fields_of
from ion.schema.files import EXTENDS_KEY, parse_yaml, read_layered
from ion.schema.overrides import apply_override, parse_override
from ion.schema.plain import canonical_json, flatten, section_json, to_plain, to_yaml

__all__ = ["EXTENDS_KEY", "Origin", "apply_override", "bounds_text", "build", "canonical_json", "describe_type",
           "display_path", "field_default", "fields_of", "flatten", "parse_override", "parse_yaml", "read_layered",
           "section_json", "to_plain", "to_yaml"]
