"""pacsnode.node"""
