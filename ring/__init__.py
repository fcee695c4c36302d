"""pacsnode.ring"""
