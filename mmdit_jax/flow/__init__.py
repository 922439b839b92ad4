"""Pure jnp diffusion math of SD3 §2-3: forward processes, predictions, timestep densities, losses."""

from mmdit_jax.flow.objectives import (
    PAPER_FORMULATIONS,
    VALID_FORMS,
    Formulation,
    parse_formulation,
    validation_timesteps,
)
from mmdit_jax.flow import samplers
from mmdit_jax.flow.paths import PROCESSES, Process, bcast, get_process
from mmdit_jax.flow.predictions import (
    PREDICTIONS,
    SIGMA_DATA,
    convert,
    edm_preconditioning,
    from_x_eps,
    to_x_eps,
)
from mmdit_jax.flow.timesteps import (
    DENSITIES,
    mode_map,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
    shifted_pdf,
    timestep_pdf,
    unshift_timesteps,
)
