"""pacsnode.cli"""
