# Rules of the qc stage.
