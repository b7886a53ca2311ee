"""autospa.mdcatch"""
