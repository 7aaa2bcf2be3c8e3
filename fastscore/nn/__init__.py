"""Drop-in layers with the constructor arguments, state_dict keys and numerics of ncsnv2."""
