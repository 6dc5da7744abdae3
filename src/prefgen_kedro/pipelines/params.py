"""The base of every parameter model: unknown keys are errors, not silent defaults.

Kedro validates a ``params:`` input whose node argument is type-hinted with a pydantic
model (its ``ParameterValidator``), so a typo in a YAML key stops the run naming the key.
"""

from pydantic import BaseModel, ConfigDict


class StrictParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
