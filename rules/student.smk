# Rules of the student stage.
