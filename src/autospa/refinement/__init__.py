"""autospa.refinement"""
