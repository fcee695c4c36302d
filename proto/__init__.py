"""pacsnode.proto"""
