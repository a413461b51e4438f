"""Entry points: python -m experiments.<name> --config configs/<file>.py [--config.a.b=value]."""
