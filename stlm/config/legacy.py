"""Configs written by older code: what a key the code added later meant before it existed."""

# Keys added after runs with checkpoints already existed, with the value that reproduces what
# the code did before the key existed (the models read a missing key with this default). A
# checkpoint whose config lacks a key is compared with this value when a run resumes.
LEGACY_VALUES = {
    'model.byte_pool.slot_embedding': False,
    'model.byte_pool.condition': 'add',
    'model.byte_pool.condition_at': 'input',
    'model.byte_pool.cross_chunks': 4,   # read only with condition 'cross_attention'
}
