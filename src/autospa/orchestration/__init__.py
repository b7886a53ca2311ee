"""autospa.orchestration"""
