"""pacsnode.replication"""
