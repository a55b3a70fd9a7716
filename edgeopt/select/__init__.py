"""Selection: constraints, the Pareto front and the objective (``pareto``), champion against challenger
(``promotion``), and what a person reads: the table, the report, the plot (``report``).
"""
