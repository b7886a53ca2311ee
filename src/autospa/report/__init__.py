"""autospa.report"""
