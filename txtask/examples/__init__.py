"""
Runnable examples: password hashing with bcrypt and a database session.

Each example is an interface module, imported by the workers, and a client
module, run from Twisted. C{python -m txtask.demo} runs both.
"""
