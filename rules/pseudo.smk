# Rules of the pseudo stage.
