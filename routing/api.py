from ninja import NinjaAPI

api = NinjaAPI(title="Keyaos", urls_namespace="v1")
