# Rules of the teacher stage.
