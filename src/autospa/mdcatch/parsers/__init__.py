"""autospa.mdcatch.parsers"""
