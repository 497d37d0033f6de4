"""The app controller's sections (one mixin per tab over :class:`app.control.base.ControllerBase`),
composed into :class:`app.controller.AppController`."""
