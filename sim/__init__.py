"""pacsnode.sim"""
