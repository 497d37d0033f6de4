"""The app's UI, one module per tab (and the model bar): ``layout`` builds its components, ``wire``
connects their events to :class:`app.controller.AppController`; :func:`app.main.build_app` composes
them."""
