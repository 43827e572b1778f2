"""Running an audit: its targets, the stage protocol and the per-unit records of finished work."""
