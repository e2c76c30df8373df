"""PhysNet model (flax.linen), in kcal/mol, Å and e. See docs/model.md."""

from packedqdc.model.electrostatics import (
    COULOMB_CONSTANT,
    coulomb_kernel,
    correct_charges,
    electrostatic_energy_per_atom,
    switch_function,
)
from packedqdc.model.layers import glorot_orthogonal, polynomial_cutoff, shifted_softplus
from packedqdc.model.physnet import (
    EF,
    MODEL_INPUT_KEYS,
    PhysNet,
    charge_sum,
    energy_and_forces,
    init_params,
    predict,
)

__all__ = [
    "COULOMB_CONSTANT",
    "EF",
    "MODEL_INPUT_KEYS",
    "PhysNet",
    "charge_sum",
    "correct_charges",
    "coulomb_kernel",
    "electrostatic_energy_per_atom",
    "energy_and_forces",
    "glorot_orthogonal",
    "init_params",
    "polynomial_cutoff",
    "predict",
    "shifted_softplus",
    "switch_function",
]
